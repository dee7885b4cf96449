"""Data loading, validation, tokenization and collation.

Import from the submodules (`dspref.data.formats`, `dspref.data.tokenize`, `dspref.data.collate`);
this package imports nothing itself so that `import dspref.data` stays cheap (no torch, no datasets).
"""
