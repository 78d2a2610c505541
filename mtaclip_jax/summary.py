"""`python -m mtaclip_jax.summary`: the command line of mtaclip_jax/cli/summary.py."""

from mtaclip_jax.cli import summary

if __name__ == "__main__":
  summary.cli()
