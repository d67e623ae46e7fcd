"""edm_lit: the library exported from the chapters of the edm-lit book (plain module, not generated)."""
__version__ = "0.1.0"
