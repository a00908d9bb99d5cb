"""The experiments built on lit_icl, behind the thin entry points in scripts/.

    momentum    scripts/reproduce.py momentum: momentum attention's perplexity (Dai et al., 2023, Table 6)
    icl_vs_ft   scripts/reproduce.py icl-vs-ft: ICL vs finetuning on a pretrained LM (Dai et al., 2023;
                Deutch et al., 2024)
    iclaa       scripts/reproduce.py iclaa: approximate conversion on a pretrained LM (Chen et al., 2024)
    icl_emergence  scripts/reproduce.py icl-emergence: the ICL score during pretraining per kind (Olsson et al., 2022)
    reproduce   running those four and generating the README's "Reproducing the papers" section
    pretrained  what icl_vs_ft and iclaa share: the model, the --quick toy data, the report layout
    kinds       scripts/kinds.py: which attention kind learns in-context recall fastest
    bench       scripts/bench.py: the benchmark of the package's performance claims
    runs        the results store, progress lines, TensorBoard scalars, figures

Experiments sit on top of the package: nothing else in lit_icl imports this subpackage.
"""
