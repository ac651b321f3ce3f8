"""Export of packed models to the formats serving stacks read (issue #31)."""
