"""Model integrations: the layer that plugs Long Exposure's operators into Hugging Face models."""
