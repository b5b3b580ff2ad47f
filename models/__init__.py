"""Models of AffectNet+: the ViT experts whose predictions become the soft labels, the FER baselines and
the valence/arousal regressor (tasks of one trainer, ``models.training``), their data, losses, image
transforms, metrics, labelling and model cards."""
