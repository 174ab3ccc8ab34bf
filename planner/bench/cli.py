"""dit-bench command line (being built)."""
import click


@click.command()
def main() -> None:
    """Compare acceleration plans with diffusers' caches on the same prompts and seeds (not implemented yet)."""
    click.echo("dit-bench: not implemented yet")
