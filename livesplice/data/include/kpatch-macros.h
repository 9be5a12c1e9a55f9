/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kpatch-macros.h for livesplice: patches written for kpatch's author headers build unchanged
 * (`#include "kpatch-macros.h"`). Written for livesplice from kpatch's documented behaviour
 * (its doc/patch-author-guide.md); each macro maps onto livesplice.h:
 *
 *   KPATCH_PRE_PATCH_CALLBACK(fn)     int fn(patch_object *): PRE_APPLY; non-zero aborts the apply
 *                                     (or refuses a module's load), and then no other callback
 *                                     of the patch runs
 *   KPATCH_POST_PATCH_CALLBACK(fn)    void fn(patch_object *): POST_APPLY
 *   KPATCH_PRE_UNPATCH_CALLBACK(fn)   void fn(patch_object *): PRE_REVERSE (cannot refuse)
 *   KPATCH_POST_UNPATCH_CALLBACK(fn)  void fn(patch_object *): POST_REVERSE, and FAIL_APPLY unless
 *                                     the pre-patch callback failed (as livepatch does when a
 *                                     transition is cancelled after the pre-patch callbacks ran)
 *
 * The callbacks get the patched object: `name` NULL for vmlinux, the module's name for a module
 * (its KBUILD_MODNAME). Unlike kpatch (livepatch's consistency model, no stop_machine), every
 * callback runs in process context, outside stop_machine; sleeping locks may be used.
 *
 *   KPATCH_IGNORE_FUNCTION(fn), KPATCH_IGNORE_SECTION("sec"): create leaves the function (the
 *       functions of the section) out of the update even if its code changed.
 *   KPATCH_FORCE_UNSAFE(fn): accepted and reported; livesplice does not skip its stack check.
 *   KPATCH_PRINTK(fmt, ...), KPATCH_PRINTK_DEFERRED(fmt, ...): rate-limited printk.
 *   KPATCH_STATIC_CALL(name): the function a static call calls now, called directly (a patch
 *       must not add static call sites of its own).
 */
#ifndef __KPATCH_MACROS_H_
#define __KPATCH_MACROS_H_

#include <linux/compiler.h>
#include <linux/printk.h>
#include <linux/static_call_types.h>
#include <livesplice.h>
#include "kpatch-syscall.h"

#if IS_ENABLED(CONFIG_LIVEPATCH)
#include <linux/livepatch.h>
typedef struct klp_object patch_object;
#else
typedef struct { const char *name; } patch_object;
#endif

#ifdef MODULE
#define __KPATCH_OBJECT_NAME KBUILD_MODNAME
#else
#define __KPATCH_OBJECT_NAME NULL
#endif

/* The object a callback is told about; whether its pre-patch callback said no. */
static patch_object __kpatch_object __maybe_unused = { .name = __KPATCH_OBJECT_NAME };
static bool __kpatch_pre_patch_failed __maybe_unused;

#define KPATCH_PRE_PATCH_CALLBACK(_fn)							\
	static int __kpatch_pre_patch_##_fn(void)					\
	{										\
		int (*callback)(patch_object *) = _fn;					\
		int ret = callback(&__kpatch_object);					\
											\
		__kpatch_pre_patch_failed = ret != 0;					\
		return ret;								\
	}										\
	LIVESPLICE_PRE_APPLY(__kpatch_pre_patch_##_fn)

#define __KPATCH_VOID_CALLBACK(_what, _fn)						\
	static void __kpatch_##_what##_##_fn(void)					\
	{										\
		void (*callback)(patch_object *) = _fn;					\
		callback(&__kpatch_object);						\
	}

#define KPATCH_POST_PATCH_CALLBACK(_fn)							\
	__KPATCH_VOID_CALLBACK(post_patch, _fn)						\
	LIVESPLICE_POST_APPLY(__kpatch_post_patch_##_fn)

#define KPATCH_PRE_UNPATCH_CALLBACK(_fn)						\
	static int __kpatch_pre_unpatch_##_fn(void)					\
	{										\
		void (*callback)(patch_object *) = _fn;					\
		callback(&__kpatch_object);						\
		return 0;								\
	}										\
	LIVESPLICE_PRE_REVERSE(__kpatch_pre_unpatch_##_fn)

#define KPATCH_POST_UNPATCH_CALLBACK(_fn)						\
	__KPATCH_VOID_CALLBACK(post_unpatch, _fn)					\
	static void __kpatch_cancel_##_fn(void)						\
	{										\
		if (!__kpatch_pre_patch_failed)						\
			__kpatch_post_unpatch_##_fn();					\
	}										\
	LIVESPLICE_POST_REVERSE(__kpatch_post_unpatch_##_fn);				\
	LIVESPLICE_FAIL_APPLY(__kpatch_cancel_##_fn)

/* Read by create (objdiff.kpatch_ignored): pointers to the functions, names of the sections. */
#define KPATCH_IGNORE_FUNCTION(_fn)							\
	static void *__kpatch_ignore_function_##_fn __used				\
	__section(".kpatch.ignore.functions") = (void *)(_fn)

#define KPATCH_IGNORE_SECTION(_sec)							\
	static const char *__UNIQUE_ID(kpatch_ignore_section_) __used			\
	__section(".kpatch.ignore.sections") = (_sec)

#define KPATCH_FORCE_UNSAFE(_fn)							\
	static void *__kpatch_force_unsafe_##_fn __used					\
	__section(".kpatch.force") = (void *)(_fn)

#define KPATCH_PRINTK(_fmt, ...) printk_ratelimited(_fmt, ##__VA_ARGS__)
#define KPATCH_PRINTK_DEFERRED(_fmt, ...) printk_deferred_once(_fmt, ##__VA_ARGS__)

#define KPATCH_STATIC_CALL(name)							\
	((typeof(&STATIC_CALL_TRAMP(name)))READ_ONCE(STATIC_CALL_KEY(name).func))

#endif /* __KPATCH_MACROS_H_ */
