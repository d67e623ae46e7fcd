"""A literate, executable book about EDM (Karras et al., NeurIPS 2022) and the tested library its chapters export.

Modules:

- `edm_lit.data`: Data plumbing: Fashion-MNIST from Debian's files, torchvision or the embedded subset (plain module, not generated)."""

__version__ = "0.1.0"
