"""A literate, executable book about EDM (Karras et al., NeurIPS 2022) and the tested library its chapters export.

Modules:

- `edm_lit.checkpoints`: Training checkpoints as safetensors + JSON, written atomically and read without pickle (plain module, not generated).
- `edm_lit.cli.args`: Argument types of the `edm-lit` command line (plain module, not generated).
- `edm_lit.cli.convert`: `edm-lit convert`: an official EDM snapshot as our safetensors + JSON checkpoint (plain module, not generated).
- `edm_lit.cli.eval`: `edm-lit eval`: FID and KID of a checkpoint's samples or of a folder of images (plain module, not generated).
- `edm_lit.cli.export`: `edm-lit export`: a checkpoint's EMA (or raw) weights alone, as a small checkpoint (plain module, not generated).
- `edm_lit.cli.info`: `edm-lit info`: a checkpoint's configuration and parameter count as JSON (plain module, not generated).
- `edm_lit.cli.phema`: `edm-lit phema` and `train --phema`: post-hoc EMA (chapter 14) on real runs (plain module, not generated).
- `edm_lit.cli.sample`: `edm-lit sample`: one PNG per seed and a grid from a checkpoint (plain module, not generated).
- `edm_lit.cli.train`: `edm-lit train`: train a model, or resume one, from the command line (plain module, not generated).
- `edm_lit.data`: Data plumbing: Fashion-MNIST from Debian's files, torchvision or the embedded subset (plain module, not generated).
- `edm_lit.datasets`: Training image sets: Fashion-MNIST, CIFAR-10 and a folder of images (plain module, not generated).
- `edm_lit.features`: The feature networks of chapter 10 and their plumbing: Inception-v3, the Fashion-MNIST classifier, input checks (plain module, not generated).
- `edm_lit.official`: Official EDM snapshots as our networks: the mapping of their classes and init_kwargs onto ours (plain module, not generated).
- `edm_lit.persistence`: Pickles of `torch_utils.persistence` (official EDM snapshots) read as data, running nothing (plain module, not generated).
- `edm_lit.runs`: A run folder: who owns it, what a crash left in it, and its metrics log (plain module, not generated).
- `edm_lit.validators`: Checks of values a user can get wrong, in one place (plain module, not generated)."""

__version__ = "0.1.0"
