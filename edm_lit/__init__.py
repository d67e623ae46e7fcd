"""A literate, executable book about EDM (Karras et al., NeurIPS 2022) and the tested library its chapters export.

Modules:

- `edm_lit.checkpoints`: Training checkpoints as safetensors + JSON, written atomically and read without pickle (plain module, not generated).
- `edm_lit.cli.args`: Argument types of the `edm-lit` command line (plain module, not generated).
- `edm_lit.cli.eval`: `edm-lit eval`: FID and KID of a checkpoint's samples or of a folder of images (plain module, not generated).
- `edm_lit.cli.info`: `edm-lit info`: a checkpoint's configuration and parameter count as JSON (plain module, not generated).
- `edm_lit.cli.sample`: `edm-lit sample`: one PNG per seed and a grid from a checkpoint (plain module, not generated).
- `edm_lit.cli.train`: `edm-lit train`: train a model, or resume one, from the command line (plain module, not generated).
- `edm_lit.data`: Data plumbing: Fashion-MNIST from Debian's files, torchvision or the embedded subset (plain module, not generated).
- `edm_lit.datasets`: Training image sets: Fashion-MNIST, CIFAR-10 and a folder of images (plain module, not generated).
- `edm_lit.features`: The feature networks of chapter 10 and their plumbing: Inception-v3, the Fashion-MNIST classifier, input checks (plain module, not generated)."""

__version__ = "0.1.0"
