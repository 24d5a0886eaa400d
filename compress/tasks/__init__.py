"""LightningModules that train and evaluate a (pruned) model."""
