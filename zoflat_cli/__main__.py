from zoflat_cli.cli import main

main()
