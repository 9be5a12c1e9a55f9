/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * livesplice.h: what a livesplice patch may use beyond the kernel's own headers.
 * `livesplice create` puts this file on the include path of its builds (it is not part of the
 * kernel tree); the patch does `#include <livesplice.h>`. docs/writing-updates.md.
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
