"""Commands over run folders: sweep (a recipe's grid as jobs on a launcher), table, plot."""
