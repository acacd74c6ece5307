"""See DESIGN.md: lands with the actor-graph, serving and fine-tuning issues."""
