from services.worker.entry import main

main()
