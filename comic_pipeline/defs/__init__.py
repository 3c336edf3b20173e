"""The Dagster layer: assets, checks, resources, sensors, schedules. No numerics here."""
