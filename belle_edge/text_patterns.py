"""Patterns for personal and order data in Chinese customer-service text: one definition for the data cleaner
(train/clean.py masks them in training data) and the runtime's automatic dialogue notes (runtime/notes.py pins
them). Torch-free, standard library only.
"""
from __future__ import annotations

import re

EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])")
# 18 characters: 6 region digits, a birth date, 3 digits and a check character (GB 11643, valid_resident_id)
RESIDENT_ID = re.compile(r"(?<!\d)\d{6}(?:18|19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?!\d)")
# a mainland mobile number, groups optionally split by "-" or " ", an optional +86 / 0086 / 86- prefix; not
# inside a longer run of digits
PHONE = re.compile(r"(?<!\d)(?:\+86[- ]?|0086[- ]?|86-)?1[3-9]\d(?:[- ]?\d{4}){2}(?!\d)")
# an order / waybill number named as such: "订单号是 JD20240615", "单号：SF1234567890", "order number A1B2C3D4"
ORDER_NUMBER = re.compile(r"(?:订单号|订单编号|单号|运单号|快递单号|order(?: number| no\.?| id)?)\s*(?:是|为|is|[:：#])?\s*"
                          r"(?P<value>[A-Za-z]{0,4}[-_]?\d[A-Za-z0-9-]{5,31})(?![A-Za-z0-9])", re.IGNORECASE)
# a mainland address: a province or city, then finer units, ending at a number (building, unit, room) or a
# named compound; the words that lead into one ("地址改成…", "寄到…") are no part of it (ADDRESS_LEAD)
ADDRESS = re.compile(r"(?P<value>[\u4e00-\u9fff]{2,8}(?:省|自治区|市)[\u4e00-\u9fff0-9A-Za-z\-]{0,30}?"
                     r"(?:区|县|镇|街道|路|街|道|巷|村)[\u4e00-\u9fff0-9A-Za-z\-]{0,30}?(?:\d+号(?:楼|院)?"
                     r"(?:\d+(?:号楼|单元|室|号|楼))*|小区|大厦|公寓))")
ADDRESS_LEAD = re.compile(r"^.*(?:地址|改成|改为|寄到|送到|发到|是|为|在)")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def valid_resident_id(number: str) -> bool:
    """Whether an 18-character resident ID number has the right GB 11643 check digit."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == number[17].upper()
