"""One module per scenario of issue 4; each exposes ``run(ctx) -> dict`` (the JSON written
to results/<stamp>/<name>.json) and ``markdown(result) -> str`` (its part of summary.md)."""
