"""`python -m ferry.services.gateway [flags]`: the gateway process alone."""

from ferry.services.gateway.entry import main

main()
