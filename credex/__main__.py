from credex.cli import main

main()
