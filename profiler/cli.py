"""dit-profile command line (grows with the profiler issue)."""
import click


@click.group(invoke_without_command=True)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Record per-block, per-timestep behaviour of a video DiT into HDF5 (not implemented yet)."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
