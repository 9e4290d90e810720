"""A user's own model, served by aqueduct-serve from an image built FROM the project's (examples/custom-image)."""
