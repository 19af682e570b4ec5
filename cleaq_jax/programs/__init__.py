"""The programs: the stage runner (`train`), the dispatcher of stages and pipelines (`pipeline`), the
vessel teacher's evaluation (`teacher`), evaluation (`evaluate`), predict, the export of a trained model
(`export`), the ablation study and the import of torchvision weights (`import_weights`). They are built
on the library (the rest of `cleaq_jax`), which never imports them (docs/architecture.md).
"""
