"""Our own model code: plain nn.Modules whose state_dict keys match diffusers/transformers."""
