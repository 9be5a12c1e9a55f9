/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * livesplice.h: what a livesplice patch may use beyond the kernel's own headers.
 * `livesplice create` puts this file on the include path of the post build (it is not part of
 * the kernel tree); the patch does `#include <livesplice.h>`. docs/writing-updates.md.
 *
 * Shadow data: new fields for existing objects, without changing any layout. Data of `size`
 * bytes is attached to an object's address under a numeric id the patch chooses; it is owned by
 * livesplice's core module, not by the update, so it outlives the update that made it (a later
 * update stacked on it sees the same data) and keeps the core loaded while it exists. Lookups
 * are lock-free (RCU); the functions may be called in any context the gfp flags allow.
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
/* Detach and free obj's data under id (after an RCU grace period), if there is any. */
void livesplice_shadow_free(void *obj, unsigned long id);
/* Detach and free the data under id of every object. */
void livesplice_shadow_free_all(unsigned long id);

#endif
