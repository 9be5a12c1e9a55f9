/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * livesplice.h: what a livesplice patch may use beyond the kernel's own headers.
 * `livesplice create` puts this file on the include path of its builds (it is not part of the
 * kernel tree); the patch does `#include <livesplice.h>`. docs/writing-updates.md.
 *
 * Hooks: functions of the patch that run when the update is switched in or out, each declared
 * with one of the macros below, naming a function of the patch (new, or changed). Several of one
 * kind run in source order. For an update of a module, the hooks of that module's code run when
 * the module is patched: at apply if it is loaded, else when it loads.
 *   LIVESPLICE_PRE_APPLY(fn)    int fn(void), before the machine is stopped; non-zero aborts the
 *                               apply (nothing changed; the FAIL_APPLY hooks run).
 *   LIVESPLICE_CHECK_APPLY(fn)  int fn(void), inside stop_machine before any write, at every try;
 *                               non-zero aborts the apply.
 *   LIVESPLICE_APPLY(fn)        void fn(void), inside stop_machine after the jumps are written.
 *   LIVESPLICE_POST_APPLY(fn)   void fn(void), after the machine runs again.
 *   LIVESPLICE_FAIL_APPLY(fn)   void fn(void), when the apply is abandoned after PRE_APPLY ran
 *                               (a hook said no, a thread stayed in the code, a mismatch).
 *   LIVESPLICE_PRE_REVERSE ... LIVESPLICE_FAIL_REVERSE: the same five for undo.
 * Hooks inside stop_machine (CHECK_*, APPLY, REVERSE) run with interrupts off on one CPU while
 * the others spin: they must not sleep, take sleeping locks or wait for other CPUs.
 *
 * Shadow data: new fields for existing objects, without changing any layout. Data of `size`
 * bytes is attached to an object's address under a numeric id the patch chooses; it is owned by
 * livesplice's core module, not by the update, so it outlives the update that made it (a later
 * update stacked on it sees the same data) and keeps the core loaded while it exists.
 *
 * Contract:
 * - Context: any context but NMI (changes take a spinlock with interrupts off); alloc and
 *   get_or_alloc may sleep exactly when `gfp` allows it.
 * - Lifetime: a pointer returned stays valid until that data is freed (livesplice_shadow_free or
 *   _free_all), which the patch does when the object goes away (in the object's destructor
 *   path, for example) or when the field is no longer needed. Freed data is released after an
 *   RCU grace period: a reader that got the pointer inside rcu_read_lock() may use it until
 *   rcu_read_unlock() even if another CPU frees it meanwhile. Serialising the data's own
 *   contents (a lock, atomics) is the patch's business, as for any field.
 * - Identity: the object's address and the id; an object freed and reallocated at the same
 *   address keeps stale shadow data unless the patch frees it with the object.
 * - Zeroed: new data is zero-filled; alloc returns NULL when data exists already, and
 *   get_or_alloc returns the existing data then (its size is the first caller's).
 */
#ifndef _LIVESPLICE_H
#define _LIVESPLICE_H

#include <linux/types.h>
#include <linux/gfp.h>
#include <linux/compiler.h>

typedef int (*livesplice_check_hook)(void);
typedef void (*livesplice_action_hook)(void);

/* A hook is a pointer to its function in section .livesplice.hooks.KIND of the object, named
 * after its line (the compiler may emit variables in any order; create sorts them by line):
 * create reads them there, and carries the functions into the update. */
#define __LIVESPLICE_HOOK_AT(kind, type, fn, line)					\
	static const type __livesplice_hook_##kind##_##line##_##fn			\
	__used __section(".livesplice.hooks." #kind) = (fn)
#define __LIVESPLICE_HOOK_LINE(kind, type, fn, line) __LIVESPLICE_HOOK_AT(kind, type, fn, line)
#define __LIVESPLICE_HOOK(kind, type, fn) __LIVESPLICE_HOOK_LINE(kind, type, fn, __LINE__)

#define LIVESPLICE_PRE_APPLY(fn)	__LIVESPLICE_HOOK(pre_apply, livesplice_check_hook, fn)
#define LIVESPLICE_CHECK_APPLY(fn)	__LIVESPLICE_HOOK(check_apply, livesplice_check_hook, fn)
#define LIVESPLICE_APPLY(fn)		__LIVESPLICE_HOOK(apply, livesplice_action_hook, fn)
#define LIVESPLICE_POST_APPLY(fn)	__LIVESPLICE_HOOK(post_apply, livesplice_action_hook, fn)
#define LIVESPLICE_FAIL_APPLY(fn)	__LIVESPLICE_HOOK(fail_apply, livesplice_action_hook, fn)
#define LIVESPLICE_PRE_REVERSE(fn)	__LIVESPLICE_HOOK(pre_reverse, livesplice_check_hook, fn)
#define LIVESPLICE_CHECK_REVERSE(fn)	__LIVESPLICE_HOOK(check_reverse, livesplice_check_hook, fn)
#define LIVESPLICE_REVERSE(fn)		__LIVESPLICE_HOOK(reverse, livesplice_action_hook, fn)
#define LIVESPLICE_POST_REVERSE(fn)	__LIVESPLICE_HOOK(post_reverse, livesplice_action_hook, fn)
#define LIVESPLICE_FAIL_REVERSE(fn)	__LIVESPLICE_HOOK(fail_reverse, livesplice_action_hook, fn)

/* The data attached to obj under id, or NULL. */
void *livesplice_shadow_get(void *obj, unsigned long id);
/* New zeroed data of size bytes for obj under id; NULL if it exists already or memory is short. */
void *livesplice_shadow_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp);
/* The data attached to obj under id, made (zeroed) if there was none; NULL if memory is short. */
void *livesplice_shadow_get_or_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp);
/* Detach obj's data under id, if there is any, and free it after an RCU grace period. */
void livesplice_shadow_free(void *obj, unsigned long id);
/* Detach the data under id of every object, and free it after an RCU grace period. */
void livesplice_shadow_free_all(unsigned long id);

#endif
