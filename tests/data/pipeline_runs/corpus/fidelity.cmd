python c_measure_edge_fidelity.py --dataset_path @ROOT@/parcellation_datasets/heldout_corpus_tinybard_tinybard --model_type tinybard --device auto --tokens 2048 
