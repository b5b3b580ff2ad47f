"""Models of AffectNet+: the ViT experts whose predictions become the soft labels, their losses,
image transforms, metrics and model cards."""
