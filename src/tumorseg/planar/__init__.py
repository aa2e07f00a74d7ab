"""2-D (planar) branch: single-slice MRI segmentation, tumour-type classification and tumour detection.

Data comes from :mod:`tumorseg.data.planar` (Figshare ``.mat`` slices with masks, Kaggle yes/no
images, or the embedded generated data), preprocessed to ``(S, S)`` float32 images. Modules:

- :mod:`tumorseg.planar.config` — params sections ``model_2d``, ``train_2d``, ``detect``, ``evaluate_2d``;
- :mod:`tumorseg.planar.datamodule` — npz dataset, MONAI dictionary augmentation, Lightning DataModule;
- :mod:`tumorseg.planar.networks` — the segmentation U-Net (built by :mod:`tumorseg.models.networks`)
  and the small classification CNN;
- :mod:`tumorseg.planar.module` — the LightningModule (segmentation + detection + type heads);
- :mod:`tumorseg.planar.train` — ``train_planar()`` (``tumorseg train-2d``);
- :mod:`tumorseg.planar.package` — the self-contained model folder (weights + config + detector rule);
- :mod:`tumorseg.planar.predict` — ``predict_planar()`` and the ``predict``/``detect`` file writers;
- :mod:`tumorseg.planar.detection` — detector selection on validation, metrics with patient-level CIs;
- :mod:`tumorseg.planar.evaluate` — ``tumorseg evaluate-2d``: test metrics, MLflow, registration.
"""
