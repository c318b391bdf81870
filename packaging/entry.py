"""Entry point of the single executable."""

from appliance.cli import main

main()
