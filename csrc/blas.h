/* BLAS entry points: scipy-openblas32 (symbols prefixed scipy_) or a system OpenBLAS (cblas.h). */
#ifndef FACTRACE_BLAS_H
#define FACTRACE_BLAS_H
#ifdef FACTRACE_BLAS_SCIPY
#include <cblas.h> /* scipy_openblas32/include: declares scipy_cblas_* */
#define cblas_sgemm scipy_cblas_sgemm
#define openblas_set_num_threads scipy_openblas_set_num_threads
#define openblas_get_num_threads scipy_openblas_get_num_threads
#define openblas_get_config scipy_openblas_get_config
#else
#include <cblas.h>
#endif
#endif
