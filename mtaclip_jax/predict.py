"""`python -m mtaclip_jax.predict`: the command line of mtaclip_jax/cli/predict.py."""

from mtaclip_jax.cli import predict

if __name__ == "__main__":
  predict.cli()
