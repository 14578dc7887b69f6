"""Datasets and episode sampling (no Lightning: its data module is in fewshot.training).

- :mod:`~fewshot.data.episodes`: the episode sampler (what a dataset must provide, and tasks);
- :mod:`~fewshot.training.datamodule`: :class:`FewShotDataModule`, the LightningDataModule;
- datasets: :mod:`~fewshot.data.omniglot`, :mod:`~fewshot.data.mini_imagenet`,
  :mod:`~fewshot.data.cifar_fs`, :mod:`~fewshot.data.image_folder` (your own images), all
  built on :mod:`~fewshot.data.class_images` and its cache :mod:`~fewshot.data.split_cache`,
  and registered by name in :mod:`~fewshot.data.registry`;
- regression: :mod:`~fewshot.data.sinusoid`, MAML's sine waves (generated, no files);
- helpers: :mod:`~fewshot.data.download`, :mod:`~fewshot.data.image_decoding`,
  :mod:`~fewshot.data.safe_pickle`, :mod:`~fewshot.data.augmentation`.
"""
