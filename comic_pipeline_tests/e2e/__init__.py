"""Browser end-to-end tests: `dagster dev` driven by headless Chromium (pytest marker `e2e`)."""
