"""What an experiment is, without Ray or torch.

A sweep or an ablation is a folder. This package knows what is in one and how to read it:
its settings (`settings`), the rung ladder and what a rung measures (`fidelity`), what a trial is
and how its recipe is named (`trials`), the folder's file names (`layout`) and Ray's own files
in it (`ray_files`). The search (Ray), the analysis and the CLI share these; none of them is
imported here, so any of it can be read, and any folder opened, with neither Ray nor torch loaded.
"""
