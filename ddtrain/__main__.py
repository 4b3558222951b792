from ddtrain.cli import main

main()
