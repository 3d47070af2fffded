"""`python -m services.gateway [flags]`: the gateway process alone."""

from services.gateway.entry import main

main()
