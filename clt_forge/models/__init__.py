"""Language models: load any configured model as a TransformerLens HookedTransformer, and read
every layer's exact MLP input and output from it."""

from clt_forge.models.activations import mlp_activations
from clt_forge.models.loading import MODEL_LOADERS, load_model, model_config

__all__ = ["MODEL_LOADERS", "load_model", "mlp_activations", "model_config"]
