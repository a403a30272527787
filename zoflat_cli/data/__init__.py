"""Data sets: LIBSVM binary sets, LM-BFF's encoder tasks, MeZO's decoder-LM tasks, answer metrics; the
bundled files sit beside them (libsvm/, text/, llm/)."""
