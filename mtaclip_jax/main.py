"""`python -m mtaclip_jax.main`: the command line of mtaclip_jax/cli/main.py."""

from mtaclip_jax.cli import main

if __name__ == "__main__":
  main.cli()
