"""What the pipeline's stages share, one small module per concern (docs/development.md lists them)."""
