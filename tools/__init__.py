"""Tools of the repository (benchmark, demo-model training); not part of the installed package."""
