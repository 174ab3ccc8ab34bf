"""dit-plan command line (grows with the planner issue)."""
import click


@click.group(invoke_without_command=True)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Fit, inspect and validate acceleration plans from profiles (not implemented yet)."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
