"""Plain classes with pure cores; Ray makes them remote in infra's composition root."""
