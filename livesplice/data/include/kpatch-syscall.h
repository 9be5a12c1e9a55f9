/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kpatch-syscall.h for livesplice: KPATCH_SYSCALL_DEFINEn(name, ...), as in patches written for
 * kpatch. kpatch needs them to keep a patched system call's metadata (its tracing and
 * error-injection tables) out of the patch module; livesplice compares the objects before and
 * after the patch, where that metadata is the same as SYSCALL_DEFINEn makes, so the macros are
 * the kernel's own.
 */
#ifndef __KPATCH_SYSCALL_H_
#define __KPATCH_SYSCALL_H_

#include <linux/syscalls.h>

#define KPATCH_SYSCALL_DEFINE0(name) SYSCALL_DEFINE0(name)
#define KPATCH_SYSCALL_DEFINE1(name, ...) SYSCALL_DEFINE1(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE2(name, ...) SYSCALL_DEFINE2(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE3(name, ...) SYSCALL_DEFINE3(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE4(name, ...) SYSCALL_DEFINE4(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE5(name, ...) SYSCALL_DEFINE5(name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE6(name, ...) SYSCALL_DEFINE6(name, __VA_ARGS__)

#endif /* __KPATCH_SYSCALL_H_ */
