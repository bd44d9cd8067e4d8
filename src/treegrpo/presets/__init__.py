"""Built-in run presets (YAML), selected with `treegrpo train --preset NAME`."""
