"""Source models: timm for images, transformers for text, offline packaged copies."""
