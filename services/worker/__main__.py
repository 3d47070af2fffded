from ferry.services.worker.entry import main

main()
