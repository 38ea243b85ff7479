"""What both sides share: errors, the wire protocol, model backends, config loading, the CLI."""
