from resnet_exp.cli import main

main()
