subsets_d 0.5\ 0.8 KS=3\ 5\ 11\ 22\ 42\ 82\ 159\ 307 degree\ influence\ activation_count\ attribution\ direct_loss\ magnitude\ random count\ direct_abs 1 count\ direct_abs --exclude_layers 0 
