"""comic_pipeline: Stage 4 (semantic sequence modeling) of the comic-analysis framework."""
