"""`python -m mtaclip_jax.export`: the command line of mtaclip_jax/cli/export.py."""

from mtaclip_jax.cli import export

if __name__ == "__main__":
  export.cli()
